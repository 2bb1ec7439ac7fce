from qlora_lightning.run.commands import main

main()
