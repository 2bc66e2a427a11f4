"""pdserve on Ray Serve: the router as the ingress deployment, prefill and decode worker deployments.

``app.build_app`` is the application builder; ``worker_process`` supervises the worker process each
worker replica owns; the ingress replica runs ``router.server.RouterApp`` (the router's own wiring,
minus uvicorn). The KubeRay RayService manifest that runs it is ``deploy/ray/rayservice.yaml``; the
autoscaler scales it through ``autoscaler/actuators/ray_serve.py``.
"""
