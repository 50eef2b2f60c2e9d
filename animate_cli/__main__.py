from animate_cli.cli import main

main()
