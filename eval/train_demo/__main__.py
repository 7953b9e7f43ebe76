"""python -m eval.train_demo --flagfile=eval/flags/train_demo.flags (see the package doc).

Intentionally short: the flags come from config.TrainConfig and config.Actions, the work
from the library modules.
"""

from __future__ import annotations

import json

from absl import flags, logging

from eval.train_demo import config, probes, state, train

config.define_flags(config.TrainConfig)
config.define_flags(config.Actions)
flags.adopt_module_key_flags(config)  # --help lists them


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    cfg = config.from_flags(config.TrainConfig)
    actions = config.from_flags(config.Actions)
    if actions.smoke:
        cfg = config.smoke(cfg)
    if actions.export_only:
        print(f"exported to {state.export_latest(cfg)}")
    elif actions.probe_items:
        print(json.dumps(probes.probe_features(cfg, actions.probe_items), indent=1))
    elif actions.probe_questions:
        print(json.dumps(probes.probe_questions(cfg, actions.probe_questions), indent=1))
    else:
        final = train.train(cfg)
        print(f"finished at step {int(final['step'])}; log: {cfg.workdir}/log.jsonl")


if __name__ == "__main__":
    from eval import cli

    cli.run(main)
