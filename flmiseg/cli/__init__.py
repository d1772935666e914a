"""The command line, above everything else: flags and their parsing (flags.py), what each
--mode of `python -m flmiseg.main` runs (modes.py), the predict file command (predict.py) and
the simulator's command (simulate.py). May import any flmiseg package; none imports it.
"""
