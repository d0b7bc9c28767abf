"""Django-free ML code: nothing here imports Django or the apps."""

import os

# libgomp reads its spin policy once, when llama.cpp's library is first loaded, by whichever module
# imports llama_cpp first. Its default long spin makes idle OpenMP threads of one model burn the
# cores another model (or the web server) needs: two models evaluated in turn ran 5x slower. A
# short spin keeps single-model speed. Set here so every import path gets it; OMP_WAIT_POLICY, if
# the operator chose one, wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
