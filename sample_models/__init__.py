"""Sample models for fyc-convert: architectures (archs), glyph data (glyphs) and the rebuild script (build)."""
