from recomp_eval.cli import main

main()
