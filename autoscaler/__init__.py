"""The autoscaler: sizes the prefill and decode pools from Prometheus signals (no torch anywhere).

Modules, one concept each::

    config.py            SizingConfig (the policy's knobs) and AutoscalerConfig (the service's)
    signals.py           ScalingSignals (plain data) and PrometheusSource (PromQL over the HTTP API)
    forecast.py          Forecaster protocol; HoltForecaster (EWMA with trend), LastValueForecaster
    capacity.py          RoleCapacity: one replica's capacity at the SLOs, derived from a CostModel
    policy.py            decide(): the sizing policy, a pure function (the simulator calls it too)
    metrics.py           the autoscaler's Prometheus metrics
    service.py           Autoscaler: the loop (read -> forecast -> decide -> act or report)
    cli.py               `pdserve autoscaler`: add_arguments(parser), run(args)
    actuators/base.py    the Actuator protocol every backend implements
    actuators/kubernetes.py, actuators/local.py, actuators/ray_serve.py

Each interval the service does::

    signals = await source.read()                              # NaN / error: no signal
    forecaster.observe(signals)
    predicted = signals.with_forecast(forecaster.predict(horizon_s))
    capacity = capacity_from_cost_model(cost, sizing, predicted)
    decision = decide(predicted, state, sizing, capacity, now)  # a pure function
    await apply(actuator, decision)                            # unless advisory
"""
