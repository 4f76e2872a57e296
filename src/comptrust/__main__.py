from comptrust.cli import main

main()
