from minigenrecal.cli import main

main()
