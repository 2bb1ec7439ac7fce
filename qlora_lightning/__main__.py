from qlora_lightning.cli import main

main()
