"""The cache lab: traces, ds4 imports, replay under any policy and budget, the optimum, miss reasons."""
