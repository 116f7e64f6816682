"""The Keras/TensorFlow family: an MLP with early stopping, wrapped as a sklearn estimator.

Wrapping the network as an estimator lets it sit behind the same preprocessing pipeline
as the sklearn family, so both families log, load and serve the same way.
TensorFlow is imported lazily: the sklearn family never pays for it.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator

DEFAULT_EPOCHS = 50
PATIENCE = 5


class TrainingDiverged(RuntimeError):
    """The network's loss became NaN or infinite."""


def search_space(task: str) -> dict[str, Any]:
    """Depth, width, dropout, learning rate and batch size of the MLP."""
    # Imported here: a served model unpickles KerasMLP from this module, and hyperopt is a
    # training dependency that is not in the model's requirements (nor in its image).
    from hyperopt import hp

    return {
        "estimator": "mlp",
        "hidden_layers": hp.choice("mlp.hidden_layers", [1, 2, 3]),
        "units": hp.choice("mlp.units", [16, 32, 64, 128]),
        "dropout": hp.uniform("mlp.dropout", 0.0, 0.5),
        "learning_rate": hp.loguniform("mlp.learning_rate", -9.2, -2.3),
        "batch_size": hp.choice("mlp.batch_size", [32, 64, 128]),
    }


def build_estimator(params: dict[str, Any], task: str, seed: int, epochs: int) -> KerasMLP:
    """An unfitted MLP for one point of the search space."""
    args = {k: v for k, v in params.items() if k != "estimator"}
    return KerasMLP(task=task, seed=seed, epochs=epochs, **args)


class KerasMLP(BaseEstimator):
    """A dense network with sklearn's fit/predict/predict_proba interface."""

    def __init__(
        self,
        task: str = "classification",
        hidden_layers: int = 2,
        units: int = 64,
        dropout: float = 0.1,
        learning_rate: float = 1e-3,
        batch_size: int = 64,
        epochs: int = DEFAULT_EPOCHS,
        seed: int = 0,
    ) -> None:
        self.task = task
        self.hidden_layers = hidden_layers
        self.units = units
        self.dropout = dropout
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.epochs = epochs
        self.seed = seed

    def _build(self, n_inputs: int, n_outputs: int) -> Any:
        import keras

        layers = [keras.Input(shape=(n_inputs,))]
        for _ in range(int(self.hidden_layers)):
            layers.append(keras.layers.Dense(int(self.units), activation="relu"))
            if self.dropout > 0:
                layers.append(keras.layers.Dropout(float(self.dropout)))
        if self.task == "classification":
            layers.append(keras.layers.Dense(n_outputs, activation="softmax"))
            loss = "sparse_categorical_crossentropy"
        else:
            layers.append(keras.layers.Dense(1))
            loss = "mse"
        model = keras.Sequential(layers)
        model.compile(optimizer=keras.optimizers.Adam(float(self.learning_rate)), loss=loss)
        return model

    def fit(self, X: np.ndarray, y: Any) -> KerasMLP:
        """Train with early stopping on a 15% validation tail; raise if the loss diverges."""
        import keras

        keras.utils.set_random_seed(int(self.seed))
        X = np.asarray(X, dtype="float32")
        if self.task == "classification":
            self.classes_, target = np.unique(np.asarray(y), return_inverse=True)
            n_outputs = len(self.classes_)
        else:
            target = np.asarray(y, dtype="float32")
            # Scaling the target keeps the default learning rates sensible for any units.
            self.y_mean_, self.y_std_ = float(target.mean()), float(target.std() or 1.0)
            target = (target - self.y_mean_) / self.y_std_
            n_outputs = 1
        self.model_ = self._build(X.shape[1], n_outputs)
        history = self.model_.fit(
            X,
            target,
            epochs=int(self.epochs),
            batch_size=int(self.batch_size),
            validation_split=0.15,
            verbose=0,
            callbacks=[
                keras.callbacks.TerminateOnNaN(),
                keras.callbacks.EarlyStopping(
                    patience=PATIENCE, restore_best_weights=True, monitor="val_loss"
                ),
            ],
        )
        losses = history.history.get("loss", [])
        if not losses or not np.all(np.isfinite(losses)):
            raise TrainingDiverged("training loss became NaN or infinite")
        self.epochs_run_ = len(losses)
        return self

    def _raw(self, X: np.ndarray) -> np.ndarray:
        return self.model_.predict(np.asarray(X, dtype="float32"), verbose=0, batch_size=4096)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities, columns ordered as ``classes_``."""
        return self._raw(X)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Class labels, or values for regression."""
        raw = self._raw(X)
        if self.task == "classification":
            return self.classes_[raw.argmax(axis=1)]
        return raw[:, 0] * self.y_std_ + self.y_mean_

    def __getstate__(self) -> dict[str, Any]:
        # Keras models do not pickle; store the native .keras archive as bytes instead.
        state = self.__dict__.copy()
        model = state.pop("model_", None)
        if model is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "model.keras")
                model.save(path)
                with open(path, "rb") as handle:
                    state["model_bytes_"] = handle.read()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        blob = state.pop("model_bytes_", None)
        self.__dict__.update(state)
        if blob is not None:
            import keras

            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "model.keras")
                with open(path, "wb") as handle:
                    handle.write(blob)
                self.model_ = keras.models.load_model(path)
