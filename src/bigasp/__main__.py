from bigasp.cli import main

main()
