"""`python -m sinkstream.kernels [-v]`: build the CPU kernels now (``make`` does this at install)."""
import sys

from . import build_dir, load

print(f"sinkstream kernels: {'built' if load(verbose='-v' in sys.argv) else 'NOT built'} in {build_dir()}")
