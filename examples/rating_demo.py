"""The rating page on its own, with handwritten digits as the queries (no training run, no download).

    python examples/rating_demo.py outputs/rating-demo --raters alice      # then open the printed link
    python examples/rating_demo.py outputs/rating-demo --raters alice --screenshot docs/figures/rating_page.png

Queues 8 digits of scikit-learn's ``load_digits`` as one round of queries (what ``HumanOracle.enqueue`` does for
a SEIKO round), serves the page and prints the mean rating of each digit as it is completed. With
``--screenshot`` a headless Chromium (Debian's ``chromium`` + Playwright) logs in and saves a picture instead.
"""

import argparse
import shutil
import threading

import torch
from sklearn.datasets import load_digits

from hf_control_ft.feedback.human_oracle import HumanOracle
from hf_control_ft.feedback.rating_server import start_rating_server


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output_dir")
    parser.add_argument("--raters", nargs="+", default=["alice"])
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--screenshot", default=None)
    args = parser.parse_args(argv)
    digits = load_digits()
    images = torch.tensor(digits.images[:8], dtype=torch.float32)[:, None] / 16.0  # (8, 1, 8, 8) in [0, 1]
    prompts = [f"a handwritten {int(t)}" for t in digits.target[:8]]
    oracle = HumanOracle(args.output_dir)
    keys = oracle.enqueue(images, prompts, round_index=1)
    tokens = {"alice": "demo-token"} if args.screenshot else None
    server = start_rating_server(args.output_dir, port=args.port, raters=tokens or args.raters)
    if args.screenshot:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 640, "height": 700})
            page.goto(f"{server.url}#token=demo-token")
            page.wait_for_selector("#image[data-assignment]")
            page.screenshot(path=args.screenshot)
            browser.close()
        print(f"wrote {args.screenshot}")
        return 0
    done = threading.Event()

    def report():
        for i, answer in oracle.answers(keys):
            print(f"{prompts[i]}: {answer.status} {answer.value:.2f}", flush=True)
        done.set()

    threading.Thread(target=report, daemon=True).start()
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
