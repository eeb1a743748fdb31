"""The command line: argument dataclasses and the parsing machinery (config files, --help, did-you-mean)."""
