"""flowline gateway: one front door for the deployed MLflow models.

Starlette + uvicorn in front of `mlflow models serve` replicas, with the stock
wire format, blue/green switching driven by the controller, adaptive batching,
API keys, limits, Prometheus metrics and a capture hook for drift monitoring.
"""

from serving.deployment import BatchingSettings, Deployment
from serving.gateway.app import create_app
from serving.gateway.capture import CapturedRequest, OnScored
from serving.gateway.config import GatewayConfig
from serving.gateway.core import Gateway
from serving.gateway.routes import RouteTable
from serving.gateway.server import serve_gateway

__all__ = [
    "BatchingSettings",
    "CapturedRequest",
    "Deployment",
    "Gateway",
    "GatewayConfig",
    "OnScored",
    "RouteTable",
    "create_app",
    "serve_gateway",
]
