"""$ mpirun -n 4 python -m mpitrain train"""
from mpitrain.cli import main

main()
