import sys

if sys.argv[1:2] == ["estimate"]:  # not a LightningCLI subcommand: it builds no Trainer and loads no weights
    from qlora_lightning.estimate import main as estimate

    estimate(sys.argv[2:])
else:
    from qlora_lightning.cli import main

    main()
