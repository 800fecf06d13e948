"""Non-private reference points on the heart job's pooled validation splits (seeds 10-19):
scikit-learn logistic regression on Cleveland alone, with its intercept refitted on the private
train data, on Cleveland plus the private train data, and on the private train data alone.
Validation data only; no test split is read. Needs scikit-learn and scipy.

    PYTHONPATH=. python examples/heart_selection/ceilings.py
"""
import numpy as np
from sklearn.linear_model import LogisticRegression
from secfedtl.data import load_fed_heart_disease, standardize, validation_split
centres, _ = standardize(load_fed_heart_disease(), stats_from="cleveland")
clients = ["hungary", "switzerland", "va"]
res = {}
for seed in range(10, 20):
    fits, vals = [], []
    for k, n in enumerate(clients):
        c = centres[n]; xf, yf, xv, yv = validation_split(c.x_train, c.y_train, 0.2, seed + k)
        fits.append((xf, yf)); vals.append((xv, yv))
    xv = np.concatenate([v[0] for v in vals]); yv = np.concatenate([v[1] for v in vals])
    xp = np.concatenate([f[0] for f in fits]); yp = np.concatenate([f[1] for f in fits])
    src = centres["cleveland"]
    for C in [0.01, 0.1, 1.0]:
        lr = LogisticRegression(C=C, max_iter=2000).fit(src.x_train, src.y_train)
        res.setdefault(f"cleveland LR C={C}", []).append(lr.score(xv, yv))
        # refit intercept only on pooled private fit data
        z = xp @ lr.coef_[0]
        from scipy.optimize import minimize_scalar
        f = lambda b: np.mean(np.logaddexp(0, -(2*yp-1)*(z+b)))
        b = minimize_scalar(f).x
        res.setdefault(f"cleveland LR C={C} + private intercept", []).append(np.mean(((xv @ lr.coef_[0] + b) > 0) == yv))
        lr2 = LogisticRegression(C=C, max_iter=2000).fit(np.concatenate([src.x_train, xp]), np.concatenate([src.y_train, yp]))
        res.setdefault(f"pooled all LR C={C}", []).append(lr2.score(xv, yv))
        lr3 = LogisticRegression(C=C, max_iter=2000).fit(xp, yp)
        res.setdefault(f"pooled private-only LR C={C}", []).append(lr3.score(xv, yv))
for k, v in res.items(): print(f"{k:45s} {np.mean(v):.3f} ± {np.std(v):.3f}")
