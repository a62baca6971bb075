"""$ mpirun -n 2 python examples/linnerud.py [--epochs 300] [--out data/linnerud]

Multi-output regression on real data: scikit-learn's bundled Linnerud set
(20 men, 3 exercise counts -> 3 body measurements: weight, waist, pulse),
written as an HDF5 file of one's own and indexed in place, as in
examples/diabetes.py; prints the mean RMSE and R² over the three outputs
beside ridge regression on the same split.  Twenty samples: the figures
are noisy, and the point is the multi-output path.
"""
import sys

import mpitrain

mpitrain.init()  # before numpy loads: BLAS threads per rank; an error on a rank ends the job

from diabetes import run

if __name__ == "__main__":
    sys.exit(mpitrain.run_or_abort(lambda: run("linnerud", [16], 300, batch_size=8)))
