from datamanip.cli import main

main()
