"""The command-line layer: parse arguments, call one library function, print the result.

No logic lives here; everything a command does is importable from the library and tested there.
"""
