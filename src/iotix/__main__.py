"""``python -m iotix`` runs the command line."""

from iotix.cli import main

main()
