"""Traffic for a rollout, with the true labels sent back: MNIST test images through the
gateway's Predict (each from one of many users, by routing key), then SubmitFeedback with
each image's true label, in batches as the answers come. Prints what each version answered
and its accuracy, as the test computes it; the rollout's own figures must agree.

    python scripts/rollout_traffic.py mnist-classifier --images 3000

The gateway and API key come from MLMESH_GATEWAY and MLMESH_API_KEY, as for `mlmesh`.
"""

from __future__ import annotations

import argparse
from collections import Counter

from mlmesh_client.client import Client
from services.training.ml.data import load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--users", type=int, default=500, help="routing keys to spread over")
    parser.add_argument("--batch", type=int, default=100, help="labels per SubmitFeedback")
    args = parser.parse_args()
    test = load_dataset("mnist").test
    images, labels = test.images.numpy(), test.labels.numpy()
    answered: Counter[int] = Counter()
    right: Counter[int] = Counter()
    pending: list[tuple[str, int]] = []
    with Client() as mesh:
        for i in range(args.images):
            image, label = images[i % len(images)], int(labels[i % len(labels)])
            user = f"user-{i % args.users}"
            answer = mesh.predict(image, model_name=args.model, routing_key=user)
            answered[answer.model_version] += 1
            right[answer.model_version] += int(answer.prediction == label)
            pending.append((answer.prediction_id, label))
            if len(pending) == args.batch:
                mesh.submit_feedback(pending)
                pending = []
        if pending:
            mesh.submit_feedback(pending)
    for version in sorted(answered):
        print(
            f"v{version}: answered {answered[version]}, accuracy "
            f"{right[version] / answered[version]:.4f}"
        )


if __name__ == "__main__":
    main()
