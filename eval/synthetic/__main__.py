"""python -m eval.synthetic: see eval.synthetic._cli."""

from absl import app

from eval.synthetic._cli import _define_flags, main

_define_flags()
app.run(main)
