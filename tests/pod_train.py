"""``train.py`` as ``__main__``, each train step slowed by ``POD_STEP_SLEEP`` seconds (default 0) so that
tests/test_pod.py can signal or kill one process of a multi-process run mid-run. Arguments are train.py's."""

import os
import runpy
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SLEEP = float(os.environ.get("POD_STEP_SLEEP", "0"))

if SLEEP:
    from mistral_jax.training import step as step_lib

    _jit_train_step = step_lib.jit_train_step

    def _slowed(*args, **kwargs):
        fn = _jit_train_step(*args, **kwargs)

        def step(*a):
            time.sleep(SLEEP)
            return fn(*a)

        return step

    step_lib.jit_train_step = _slowed

sys.argv = [os.path.join(ROOT, "train.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
