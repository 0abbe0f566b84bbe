from fyc_convert.cli import main

main()
