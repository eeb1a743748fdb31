"""The command line: the parsing machinery (config files, --help, did-you-mean, the `arg` field helper) and the
`JobConfig` of named sections. Each section is defined beside the component that uses it."""
