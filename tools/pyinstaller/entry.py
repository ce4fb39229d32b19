"""Entry script of the single-file executable: `multiproxy ARGS` runs the CLI, `multiproxy -m MODULE ARGS` runs a module.

The lab starts its helpers as `sys.executable -m multiproxy ...` (the proxy, the TDS and DNS lab servers); in the
executable `sys.executable` is the executable itself, so `-m` is honoured here as the interpreter would.
"""
import runpy
import sys

if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "-m":
        module = sys.argv[2]
        sys.argv = [sys.argv[0]] + sys.argv[3:]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:  # multiproxy/__main__.py: gevent patches first, then the CLI
        runpy.run_module("multiproxy", run_name="__main__", alter_sys=True)
