"""Process a batch of deletion requests, the `ray job submit` entry point: `ray-unlearn requests process`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/process_requests.py --store s3://bucket/unlearn --tracking-uri http://mlflow:5000 --limit 8

Takes exactly the options of `ray-unlearn requests process` (`python jobs/process_requests.py --help`);
exit statuses as in ray_unlearn/exit_codes.py (0 ok, 1 a request failed, 2 bad usage, 3 a gate
refused, 4 storage/MLflow/Ray trouble). Runs from a checkout without the package installed too
(jobs/_cli.py).
"""

from _cli import run_cli  # (jobs/_cli.py: also finds the package in a bare checkout)

if __name__ == "__main__":
    run_cli("requests process", "jobs/process_requests.py")
