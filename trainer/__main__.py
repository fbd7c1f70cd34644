"""`python -m trainer ...` is `spot-trainer ...` (the supervisor and `accelerate launch -m trainer` use it)."""

from .cli import main

main(prog_name="spot-trainer")
