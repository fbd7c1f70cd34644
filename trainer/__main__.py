"""`python -m trainer ...` is `spot-trainer ...` (the supervisor and `accelerate launch -m trainer` use it)."""

from trainer.cli.main import main

main(prog_name="spot-trainer")
