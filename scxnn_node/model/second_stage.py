"""The second stage: an SVM over the members' logits, stored and evaluated as plain numbers.

scikit-learn fits it (training); the node evaluates the decision function itself from the
support vectors, dual coefficients, intercept, kernel parameters and feature scaling kept in
JSON, so no pickle is ever loaded. Positive scores mean abnormal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

KERNELS = ("linear", "rbf", "poly", "sigmoid")


@dataclass(frozen=True)
class SvmSecondStage:
    """decision(x) = sum_i dual_coef_i * K(sv_i, z) + intercept, z = (x - mean) / scale."""

    kernel: str
    gamma: float
    coef0: float
    degree: int
    support_vectors: np.ndarray  # (n_sv, n_features)
    dual_coef: np.ndarray  # (n_sv,)
    intercept: float
    feature_mean: np.ndarray  # (n_features,)
    feature_scale: np.ndarray  # (n_features,)

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"SvmSecondStage.kernel must be one of {KERNELS}, got {self.kernel!r}")
        sv = np.asarray(self.support_vectors, dtype=np.float64)
        if sv.ndim != 2 or sv.shape[0] == 0:
            raise ValueError(
                f"SvmSecondStage.support_vectors must be a non-empty 2-D array, got {sv.shape}"
            )
        n_sv, n_features = sv.shape
        dual = np.asarray(self.dual_coef, dtype=np.float64).reshape(-1)
        if dual.shape != (n_sv,):
            raise ValueError(
                f"SvmSecondStage.dual_coef must have {n_sv} values (one per support vector), "
                f"got {dual.shape}"
            )
        mean = np.asarray(self.feature_mean, dtype=np.float64).reshape(-1)
        scale = np.asarray(self.feature_scale, dtype=np.float64).reshape(-1)
        for attr, arr in (("feature_mean", mean), ("feature_scale", scale)):
            if arr.shape != (n_features,):
                raise ValueError(
                    f"SvmSecondStage.{attr} must have {n_features} values, got {arr.shape}"
                )
        if not (scale > 0).all():
            raise ValueError("SvmSecondStage.feature_scale must be positive")
        for attr, arr in (("support_vectors", sv), ("dual_coef", dual)):
            if not np.isfinite(arr).all():
                raise ValueError(f"SvmSecondStage.{attr} contains non-finite values")
        object.__setattr__(self, "support_vectors", sv)
        object.__setattr__(self, "dual_coef", dual)
        object.__setattr__(self, "feature_mean", mean)
        object.__setattr__(self, "feature_scale", scale)
        object.__setattr__(self, "intercept", float(self.intercept))
        object.__setattr__(self, "gamma", float(self.gamma))
        object.__setattr__(self, "coef0", float(self.coef0))
        object.__setattr__(self, "degree", int(self.degree))

    @property
    def n_features(self) -> int:
        return int(self.support_vectors.shape[1])

    def _kernel(self, z: np.ndarray) -> np.ndarray:
        sv = self.support_vectors
        if self.kernel == "linear":
            return z @ sv.T
        if self.kernel == "rbf":
            sq = (z * z).sum(1)[:, None] + (sv * sv).sum(1)[None, :] - 2.0 * (z @ sv.T)
            return np.exp(-self.gamma * np.maximum(sq, 0.0))
        if self.kernel == "poly":
            return (self.gamma * (z @ sv.T) + self.coef0) ** self.degree
        return np.tanh(self.gamma * (z @ sv.T) + self.coef0)

    def decision_function(self, features: np.ndarray) -> np.ndarray:
        """Scores for (n, n_features) features; > threshold means abnormal."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim == 1:
            x = x[None, :]
        if x.shape[1] != self.n_features:
            raise ValueError(f"second stage expects {self.n_features} features, got {x.shape[1]}")
        z = (x - self.feature_mean) / self.feature_scale
        return self._kernel(z) @ self.dual_coef + self.intercept

    @classmethod
    def from_sklearn(cls, scaler: Any, svc: Any) -> SvmSecondStage:
        """From a fitted StandardScaler and binary SVC whose classes are (0 normal, 1 abnormal)."""
        classes = [int(c) for c in svc.classes_]
        if classes != [0, 1]:
            raise ValueError(
                f"SVC must be fitted on classes [0, 1] (normal, abnormal), got {classes}"
            )
        scale = getattr(scaler, "scale_", None)
        n_features = svc.support_vectors_.shape[1]
        return cls(
            kernel=svc.kernel,
            gamma=float(getattr(svc, "_gamma", 0.0)),
            coef0=float(svc.coef0),
            degree=int(svc.degree),
            support_vectors=np.asarray(svc.support_vectors_),
            dual_coef=np.asarray(svc.dual_coef_)[0],
            intercept=float(svc.intercept_[0]),
            feature_mean=np.asarray(scaler.mean_) if scaler is not None else np.zeros(n_features),
            feature_scale=np.asarray(scale) if scale is not None else np.ones(n_features),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "svm",
            "kernel": self.kernel,
            "gamma": self.gamma,
            "coef0": self.coef0,
            "degree": self.degree,
            "support_vectors": self.support_vectors.tolist(),
            "dual_coef": self.dual_coef.tolist(),
            "intercept": self.intercept,
            "feature_mean": self.feature_mean.tolist(),
            "feature_scale": self.feature_scale.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SvmSecondStage:
        if not isinstance(data, dict) or data.get("type") != "svm":
            raise ValueError('second stage must be an object with "type": "svm"')
        required = (
            "kernel",
            "gamma",
            "coef0",
            "degree",
            "support_vectors",
            "dual_coef",
            "intercept",
            "feature_mean",
            "feature_scale",
        )
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"second stage is missing keys {missing}")
        return cls(**{k: data[k] for k in required})

    def save(self, path: str | Path) -> None:
        # repr() of a float round-trips exactly, so the node evaluates the fitted numbers.
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> SvmSecondStage:
        return cls.from_dict(json.loads(Path(path).read_text()))
