"""pdserve on Ray Serve: the router as the ingress deployment, prefill and decode worker deployments.

``app.build_app`` is the application builder; ``worker_process`` supervises the worker process each
worker replica owns; ``router_app`` builds the router's ASGI app inside a replica. The KubeRay
RayService manifest that runs it is ``deploy/ray/rayservice.yaml``; the autoscaler scales it through
``autoscaler/actuators/ray_serve.py``.
"""
