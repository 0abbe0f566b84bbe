"""Data: datasets (arrays, memmaps, image folders), the loader, image transforms and which preprocessing applies."""
