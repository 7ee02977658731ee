"""Interactive panels (ipywidgets) that set an experiment's parameters and start it — nothing more.

A panel is a form (datapaths, numbers of services, pod modes, repeats, samples), a *Run* and a
*Stop* button, a progress bar and a plotly ``FigureWidget`` that fills in as points arrive. The
experiment runs unchanged (:func:`labkit.experiments.service_scale.run` or
:func:`labkit.experiments.pod_modes.run`) in a worker thread; its ``on_point`` callback hands each
recorded row to the panel, which redraws the figure with :mod:`labkit.plots` from the rows so far.

*Stop* is cooperative: it sets a flag, and the next ``on_point`` raises :class:`Cancelled` (a
``KeyboardInterrupt``) inside the experiment. :func:`labkit.experiments.core.execute` treats it as
an interrupt — the experiment's ``teardown`` removes its labs, the run is marked ``interrupted``
and keeps every point measured so far (resumable with ``labkit run … --resume RUN_ID``). A point
being measured finishes first, so a stop takes at most one point (about a second at small scale).

- :class:`ServiceScalePanel`: datapaths, services, positions, pod mode, repeats, samples.
- :class:`PodModesPanel`: pod modes, metrics, repeats, samples.
- :func:`panel`: both, as tabs.
- :func:`run_blocking`: call a labkit function from a notebook cell (see below).

Jupyter runs every cell inside the kernel's running asyncio loop, and pyroute2's synchronous API
(which builds labs) refuses to start there ("This event loop is already running").
:func:`run_blocking` runs the call in a short-lived thread, which has no loop, and returns its
result; outside a running loop it simply calls the function. The panels' worker threads need
nothing of the kind.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import ipywidgets as W
import pandas as pd
import plotly.graph_objects as go

from . import nsexec, plots
from .experiments import pod_modes, service_scale


run_blocking = nsexec.off_event_loop  # kept under its first name for notebooks


class Cancelled(KeyboardInterrupt):
    """Raised inside a running experiment (from its ``on_point``) when the panel's Stop is pressed."""


def _registered_datapaths() -> list[str]:
    from .datapath import DATAPATHS

    names = [d for d in service_scale.DEFAULT_DATAPATHS if d in DATAPATHS]
    return names + sorted(d for d in DATAPATHS.names() if d not in names and d != "none")


def _ints(text: str) -> list[int]:
    return [int(x.strip().replace("_", "")) for x in text.replace(";", ",").split(",") if x.strip()]


class RunPanel:
    """The shared part: buttons, progress, live figure, worker thread. Subclasses give the form,
    the parameters it sets, how many points to expect and the live figure."""

    experiment = ""
    run_fn: Callable[..., Any]

    def __init__(self) -> None:
        self.run = None  # the Run of the last finished (or stopped) run
        self.run_id: str | None = None
        self.status_text = "idle"
        self.error: BaseException | None = None
        self.rows: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.run_button = W.Button(description="Run", button_style="success", icon="play")
        self.stop_button = W.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.progress = W.IntProgress(value=0, min=0, max=1, description="points", bar_style="info",
                                      layout=W.Layout(width="420px"))
        self.status = W.HTML(value="<i>idle</i>")
        self.figure = go.FigureWidget(layout={"template": plots.TEMPLATE, "height": 420,
                                              "title": f"{self.experiment}: press Run"})
        self.run_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())

    # ------------------------------------------------------------ to override
    def controls(self) -> list[W.Widget]:
        raise NotImplementedError

    def params(self):
        raise NotImplementedError

    def expected_points(self, params) -> int:
        raise NotImplementedError

    def live_figure(self, points: pd.DataFrame) -> go.Figure:
        raise NotImplementedError

    def describe(self, row: dict) -> str:
        return ", ".join(f"{k} {row[k]}" for k in ("datapath", "mode", "services", "position", "repeat", "metric")
                         if row.get(k) not in (None, ""))

    # ------------------------------------------------------------ layout
    @property
    def widget(self) -> W.Widget:
        if not hasattr(self, "_widget"):
            form = W.VBox(self.controls(), layout=W.Layout(min_width="360px"))
            buttons = W.HBox([self.run_button, self.stop_button])
            left = W.VBox([form, buttons, self.progress, self.status])
            self._widget = W.VBox([left, self.figure])
            self._widget.add_class("labkit-panel")
        return self._widget

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
        self.leave_picture_here()

    def leave_picture_here(self) -> None:
        """A plain output under the panel that each finished (or stopped) run replaces with its chart:
        a saved or exported notebook keeps that picture (widgets need a live kernel to draw)."""
        from IPython.display import display

        self._picture = display({"text/plain": f"({self.experiment}: the chart of the panel's last run appears "
                                 "here when it ends)"}, raw=True, display_id=True)

    # ------------------------------------------------------------ running
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> threading.Thread | None:
        """Read the form, validate, and run the experiment in a worker thread."""
        if self.running:
            return self._thread
        try:
            params = self.params()
            params.validate()
        except Exception as exc:  # a bad form value: say so, run nothing
            self._set_status(f"<b style='color:#b00'>not started</b>: {_html(exc)}")
            self.error = exc
            return None
        self.rows, self.error, self.run, self.run_id = [], None, None, None
        self._stop.clear()
        self.progress.max = max(1, self.expected_points(params))
        self.progress.value = 0
        self.progress.bar_style = "info"
        self.run_button.disabled, self.stop_button.disabled = True, False
        self.figure.data = ()
        self._set_status(f"running {self.experiment}…")
        self._thread = threading.Thread(target=self._worker, args=(params,), name=f"labkit-{self.experiment}",
                                        daemon=True)
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        """Ask the run to stop after the point being measured; its teardown removes the labs."""
        if self.running:
            self._stop.set()
            self.stop_button.disabled = True
            self._set_status("stopping after the current point; tearing the labs down…")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run ends (for scripts and tests); True when it has."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    def _on_point(self, row: dict) -> None:
        with self._lock:
            self.rows.append(row)
            self.run_id = row.get("run_id", self.run_id)
            self.progress.value = min(self.progress.max, len(self.rows))
            try:
                self._redraw()
            except Exception as exc:  # a plotting hiccup must not kill the measurement
                self._set_status(f"live plot failed: {_html(exc)}")
            else:
                self._set_status(f"point {len(self.rows)}/{self.progress.max}: {self.describe(row)}")
        if self._stop.is_set():
            raise Cancelled("stopped from the panel")

    def _worker(self, params) -> None:
        started = time.time()
        try:
            self.run = type(self).run_fn(params, progress=False, on_point=self._on_point)
            self.run_id = self.run.run_id
            self.progress.bar_style = "success"
            self._finished(f"<b>done</b> in {time.time() - started:.0f} s: run <code>{self.run_id}</code> "
                           f"({len(self.rows)} points) — <code>labkit report {self.run_id}</code>")
        except Cancelled:
            self.progress.bar_style = "warning"
            self.run = self._find_run(started)
            rid = self.run.run_id if self.run else "?"
            self.run_id = rid
            self._finished(f"<b>stopped</b> after {len(self.rows)} points; labs torn down; run <code>{rid}</code> "
                           f"kept as interrupted (resume: <code>labkit run {self.experiment} --resume {rid}</code>)")
        except BaseException as exc:  # shown in the panel: a worker thread has nowhere else to report
            self.error = exc
            self.progress.bar_style = "danger"
            self._finished(f"<b style='color:#b00'>failed</b>: {_html(exc)}<pre>{_html(traceback.format_exc()[-2000:])}"
                           "</pre>")

    def _find_run(self, started: float):
        """The run this panel started (on_point rows carry no run id when the core does not add it)."""
        from .results import Run, list_runs

        if self.run_id:
            return Run.open(self.run_id)
        mine = [r for r in list_runs() if r["experiment"] == self.experiment
                and pd.Timestamp(r["started"]).timestamp() >= started - 1]
        return Run.open(mine[-1]["run_id"]) if mine else None

    def _finished(self, html: str) -> None:
        self.run_button.disabled, self.stop_button.disabled = False, True
        self._set_status(html)
        picture = getattr(self, "_picture", None)
        if picture is not None and self.figure.data:
            try:
                # the bundle itself (plotly's renderer: interactive JSON + static SVG): a figure object would
                # display itself anew (plotly's _ipython_display_) instead of replacing the placeholder
                picture.update(go.Figure(self.figure)._repr_mimebundle_(), raw=True)
            except Exception as exc:  # noqa: BLE001 - the run is done whatever the picture does
                self.picture_error = exc

    def _set_status(self, html: str) -> None:
        self.status_text = html
        self.status.value = html

    def _redraw(self) -> None:
        new = self.live_figure(pd.DataFrame(self.rows))
        have = {t.name: t for t in self.figure.data}
        with self.figure.batch_update():
            for t in new.data:
                if t.name in have:  # update in place: the chart grows instead of flickering
                    have[t.name].update({k: v for k, v in t.to_plotly_json().items() if k not in ("type", "uid")})
                else:
                    self.figure.add_trace(t)
            self.figure.update_layout(title=new.layout.title, xaxis_title=new.layout.xaxis.title.text,
                                      yaxis_title=new.layout.yaxis.title.text, barmode=new.layout.barmode,
                                      xaxis_type=new.layout.xaxis.type, yaxis_rangemode=new.layout.yaxis.rangemode)


def _html(obj) -> str:
    import html

    return html.escape(str(obj))


class ServiceScalePanel(RunPanel):
    """Service latency versus number of services: pick datapaths, Ns, positions, repeats, samples."""

    experiment = "service-scale"
    run_fn = staticmethod(service_scale.run)

    def __init__(self, params: service_scale.ServiceScaleParams | None = None, plot_position: str | None = None):
        p = params or service_scale.ServiceScaleParams(services=[1, 500], positions=["first", "last"],
                                                       repeats=2, samples=300, warmup=30, updates=1)
        self.base = p
        super().__init__()
        style = {"description_width": "100px"}
        known = _registered_datapaths()
        self.datapaths = W.SelectMultiple(options=known, value=[d for d in p.datapaths if d in known],
                                          description="datapaths", rows=min(6, len(known)), style=style)
        self.services = W.Text(value=", ".join(map(str, p.services)), description="services",
                               placeholder="e.g. 1,1000,5000", style=style)
        self.positions = W.SelectMultiple(options=list(service_scale.POSITIONS), value=list(p.positions),
                                          description="positions", rows=5, style=style)
        from .modes import names as mode_names

        self.mode = W.Dropdown(options=mode_names(), value=p.mode, description="pod mode", style=style)
        self.repeats = W.BoundedIntText(value=p.repeats, min=1, max=50, description="repeats", style=style)
        self.samples = W.BoundedIntText(value=p.samples, min=10, max=1_000_000, step=100, description="samples",
                                        style=style)
        pos = plot_position or next((x for x in ("last", "middle", "first") if x in p.positions), p.positions[0])
        self.plot_position = W.Dropdown(options=list(service_scale.POSITIONS), value=pos,
                                        description="plot position", style=style)
        self.plot_position.observe(lambda _: self.rows and self._redraw(), names="value")

    def controls(self) -> list[W.Widget]:
        return [self.datapaths, self.services, self.positions, self.mode, self.repeats, self.samples,
                self.plot_position]

    def params(self) -> service_scale.ServiceScaleParams:
        return dataclasses.replace(self.base, datapaths=list(self.datapaths.value), services=_ints(self.services.value),
                                   positions=list(self.positions.value), mode=self.mode.value,
                                   repeats=int(self.repeats.value), samples=int(self.samples.value),
                                   warmup=min(self.base.warmup, max(10, int(self.samples.value) // 10)))

    def expected_points(self, p) -> int:
        per_n = len(p.datapaths) * (1 + p.updates + p.repeats * len(p.positions) * len(p.metrics))
        return per_n * len(p.services)

    def live_figure(self, points: pd.DataFrame) -> go.Figure:
        metric = self.base.metrics[0]
        return plots.latency_vs_services(points, metric, self.plot_position.value,
                                         title=f"live: {metric.upper()} p50 to the {self.plot_position.value} service "
                                               "(median of repeats so far)")


class PodModesPanel(RunPanel):
    """Pod network modes: pick modes, metrics, repeats, samples; bars fill in per point."""

    experiment = "pod-modes"
    run_fn = staticmethod(pod_modes.run)

    def __init__(self, params: pod_modes.PodModesParams | None = None, plot_metric: str | None = None):
        p = params or pod_modes.PodModesParams(modes=["eni-exclusive", "eni-policy-route", "veth", "overlay"],
                                               metrics=["crr", "rr"], repeats=1, samples=300, warmup=30,
                                               bandwidth_seconds=1.0)
        self.base = p
        super().__init__()
        style = {"description_width": "100px"}
        from .modes import names as mode_names

        # the pod modes, and the variants pod-modes measures beside them (host-network, veth+bpf-hr, ...)
        self.modes = W.SelectMultiple(options=list(dict.fromkeys([*mode_names(), *p.modes])), value=list(p.modes),
                                      description="pod modes", rows=7,
                                      style=style)
        self.metrics = W.SelectMultiple(options=["crr", "rr", "udp_rr", "bandwidth"], value=list(p.metrics),
                                        description="metrics", rows=4, style=style)
        self.repeats = W.BoundedIntText(value=p.repeats, min=1, max=50, description="repeats", style=style)
        self.samples = W.BoundedIntText(value=p.samples, min=10, max=1_000_000, step=100, description="samples",
                                        style=style)
        self.plot_metric = W.Dropdown(options=["crr", "rr", "udp_rr", "bandwidth"],
                                      value=plot_metric or p.metrics[0], description="plot metric", style=style)
        self.plot_metric.observe(lambda _: self.rows and self._redraw(), names="value")

    def controls(self) -> list[W.Widget]:
        return [self.modes, self.metrics, self.repeats, self.samples, self.plot_metric]

    def params(self) -> pod_modes.PodModesParams:
        return dataclasses.replace(self.base, modes=list(self.modes.value), metrics=list(self.metrics.value),
                                   repeats=int(self.repeats.value), samples=int(self.samples.value))

    def expected_points(self, p) -> int:
        return p.repeats * len(p.modes) * 2 * len(p.metrics)

    def live_figure(self, points: pd.DataFrame) -> go.Figure:
        return plots.mode_bars(points, self.plot_metric.value)

    def _redraw(self) -> None:
        self.figure.data = ()  # bars: categories change as modes arrive, so redraw whole
        super()._redraw()


class Panels:
    """Both panels as tabs (the workshop's lab console), each leaving its last run's chart below."""

    def __init__(self, service_params=None, modes_params=None):
        self.panels = (ServiceScalePanel(service_params), PodModesPanel(modes_params))
        self.tab = W.Tab(children=[p.widget for p in self.panels])
        self.tab.set_title(0, "service scale")
        self.tab.set_title(1, "pod modes")

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.tab)
        for p in self.panels:
            p.leave_picture_here()


def panel(service_params=None, modes_params=None) -> Panels:
    """Both panels, starting from the notebook's parameters (``service_params``: a
    ServiceScaleParams, ``modes_params``: a PodModesParams)."""
    return Panels(service_params, modes_params)


__all__ = ["run_blocking", "Cancelled", "RunPanel", "ServiceScalePanel", "PodModesPanel", "Panels", "panel"]
