"""One APIRouter per protocol: ops (health, readiness, metrics), v1 (models, predict,
recommendations, similar), admin (reload), mlflow (/invocations) and v2 (Open Inference
Protocol). `service.app.create_app` includes them in that order."""
