"""python -m eval.synthetic: see eval.synthetic._cli."""

from eval import cli
from eval.synthetic._cli import _define_flags, main

_define_flags()
cli.run(main)
