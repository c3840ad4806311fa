"""The Textual dashboard (``vqabench`` with no command): see :mod:`vqabench.tui.app`.

Only this package imports textual; the runner, store, report and headless modules never do.
"""
