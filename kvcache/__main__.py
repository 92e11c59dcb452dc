from kvcache.cli import main

main()
