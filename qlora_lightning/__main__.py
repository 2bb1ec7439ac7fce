from qlora_lightning.commands import main

main()
