"""Run ``train.py`` with a checkpoint write that fails: ``python nothing_lost_train_fault.py STEP ERRNO train.py ARGS``.

Every file write under step ``STEP``'s (temporary) checkpoint directory raises ``OSError(ERRNO)`` - as a full disk
(``ENOSPC``) or a read-only directory (``EACCES``) would. Orbax writes its metadata and JSON items with
``etils.epath``; the array bytes go through TensorStore, which this does not reach (the save fails all the same).
"""

import errno
import os
import runpy
import sys


def install(step: int, code: int):
    """Make writes into ``<checkpoints>/<step>.orbax-checkpoint-tmp*`` (and ``<step>/``) raise ``OSError(code)``.

    Returns a function that undoes it.
    """
    from etils.epath import gpath

    saved = {k: gpath.PosixGPath.__dict__[k] for k in ("write_text", "write_bytes") if k in gpath.PosixGPath.__dict__}
    real_write_text, real_write_bytes = gpath.PosixGPath.write_text, gpath.PosixGPath.write_bytes
    marks = (f"{os.sep}{step}.orbax-checkpoint-tmp", f"{os.sep}checkpoints{os.sep}{step}{os.sep}")

    def failing(real):
        def write(self, *args, **kwargs):
            if any(m in os.fspath(self) for m in marks):
                raise OSError(code, os.strerror(code), os.fspath(self))
            return real(self, *args, **kwargs)
        return write

    gpath.PosixGPath.write_text = failing(real_write_text)
    gpath.PosixGPath.write_bytes = failing(real_write_bytes)

    def undo():
        for k in ("write_text", "write_bytes"):
            if k in saved:
                setattr(gpath.PosixGPath, k, saved[k])
            else:
                delattr(gpath.PosixGPath, k)

    return undo


if __name__ == "__main__":
    step, code = int(sys.argv[1]), getattr(errno, sys.argv[2])
    script, args = sys.argv[3], sys.argv[4:]
    install(step, code)
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
