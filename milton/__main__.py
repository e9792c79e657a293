from milton.cli import main

main()
