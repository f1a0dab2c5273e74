"""The main job on embedded defaults (`ray-unlearn demo` by another name): a deletion request for
the shipped demo model's output, a Pareto search on Ray, MLflow on SQLite, the best hotfix promoted.

    python jobs/demo.py                       # local Ray, everything under runs/demo
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/demo.py --out /shared/demo

Runs from a checkout without the package installed too (jobs/_cli.py).
"""

from _cli import run_cli  # (jobs/_cli.py: also finds the package in a bare checkout)

if __name__ == "__main__":
    run_cli("demo", "jobs/demo.py")
