"""Time the budget check a hospital runs before each distributed step (the accountant, untouched here)."""
import sys, time
sys.path.insert(0, "examples/fashion_mnist")
from run import job_config, parse_args
from fashion_job import client_names
from secfedtl.federated.distributed import plan_for
from secfedtl.privacy.budget import PrivacyBudget
args = parse_args(["--noise", "distributed", "--rounds", "3", "--batch-size", "8192", "--lr", "10", "--no-reference"])
config = job_config(args, dict.fromkeys(client_names(10), 5500), "timing")
plan = plan_for(config, 31370, job_id="timing")
budget = PrivacyBudget(epsilon=3.0, delta=1e-5, accountant="rdp")
for step in range(21):
    t = time.perf_counter(); budget.check(plan.event); c = time.perf_counter() - t
    budget.spend(plan.event, check=False)
    if step in (0, 1, 10, 20):
        print(f"step {step}: budget.check {c:.3f}s, spent {budget.spent_epsilon:.3f}")
