"""fusion_node: live camera, lidar and IMU topics in; fused state and diagnostics out (rclpy lifecycle).

configure = load the model onto its backend; activate = subscribe, publish, fuse on a timer (or on a
trigger sensor); deactivate / cleanup release them. /diagnostics is published in every state (its
lifecycle state and why it is idle). Every message goes through the core's adapters and sensor sync;
a bad one is counted, logged (throttled) and dropped, never fatal.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import TwistStamped, Vector3Stamped
from nav_msgs.msg import Odometry
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.qos_overriding_options import QoSOverridingOptions
from sensor_msgs.msg import CompressedImage, Image, Imu, LaserScan, PointCloud2
from std_msgs.msg import String

from .adapters import msgtype_of, to_frame
from .attention_maps import attend, camera_rgb, picture
from .clock import trigger_modality
from .errors import ConfigError, FusionAttnError, MalformedMessageError
from .frames import MODALITIES, NS_PER_S, CameraFrame, FusedState, Modality
from .messages import (
    diagnostics_msg,
    ego_twist_msg,
    fused_state_layout_msg,
    fused_state_msg,
    image_msg,
    sensor_values_msg,
    to_rclpy,
)
from .outputs import ERROR, OK, WARN, Status, diagnostics, trust_values
from .params import PARAMETERS, TAU_NAMES, Param
from .pipeline import FusionPipeline, load_model, weights_digest
from .spin import accept_whole_numbers, spin
from .sync import SensorSync, SyncConfig
from .tokenize import SensorSnapshot, Tokenizer

if TYPE_CHECKING:
    from .model import FusionModel

MESSAGE_TYPES = {("camera", "image"): Image, ("camera", "compressed"): CompressedImage,
                 ("lidar", "pointcloud2"): PointCloud2, ("lidar", "laserscan"): LaserScan, ("imu", "imu"): Imu,
                 ("odometry", "odometry"): Odometry, ("imu2", "imu"): Imu}
# ROS 2's standard per-topic QoS parameters, qos_overrides.<topic>.<publisher|subscription>.<policy> for
# history, depth and reliability: rclpy declares them (read-only) as it creates each publisher and subscription
QOS_OVERRIDES = QoSOverridingOptions.with_default_policies()


class FusionNode(LifecycleNode):
    def __init__(self, **kwargs):
        super().__init__("fusion_node", **kwargs)
        accept_whole_numbers(self, {p.name for p in PARAMETERS if isinstance(p.default, float)})
        for p in PARAMETERS:
            self.declare_parameter(p.name, p.default, _descriptor(p))
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.pipeline: FusionPipeline | None = None
        # what activate creates and deactivate destroys; not rclpy Node's own _subscriptions and _timers, which
        # hold every subscription and timer (the diagnostics timer too, which lives in every state)
        self._io_subs, self._io_timers = [], []
        self._last_state: FusedState | None = None
        self._processing_ms = self._latency_ms = 0.0
        self._fuse_errors = 0
        self._withheld = 0  # fusions with every sensor masked: no state to publish
        self._masked = np.zeros(len(Modality), np.int64)  # fusions that masked each sensor
        self._stamp_ns: int | None = None  # of the last state published
        self._qos_declared = False  # set at the first activation: see _on_set_parameters
        self._type_warned: set[tuple[str, ...]] = set()
        # one child logger per sensor: rclpy throttles per logger and call site, so a flood on one
        # sensor must not silence the reports of another
        self._sensor_log = {m: self.get_logger().get_child(MODALITIES[m]) for m in Modality}
        self._attention_image: tuple[FusionModel, Tokenizer] | None = None  # configured with attention_image
        self._published: tuple[int, SensorSnapshot] | None = None  # the newest state's stamp and data, unpictured
        self._idle = (WARN, "not configured yet")  # level and reason reported while not active
        # created with the node, not at configure: an unconfigured or inactive node reports why it is idle
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10,
                                              qos_overriding_options=QOS_OVERRIDES)
        self._diag_timer = self.create_timer(self.p("diagnostics_period_s"), self._publish_diagnostics)

    def p(self, name: str):
        return self.get_parameter(name).value

    # --- lifecycle -------------------------------------------------------------------------------

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.pipeline = FusionPipeline.from_params({p.name: self.p(p.name) for p in PARAMETERS})
            self.sensors = self._configured_sensors(self.pipeline.cfg.sensor_names)
            self._attention_image = self._attention_renderer() if self.p("attention_image.enabled") else None
        except FusionAttnError as exc:
            return self._configure_failed(str(exc))
        except Exception as exc:  # noqa: BLE001 - rclpy would swallow it silently; say what failed
            return self._configure_failed(f"{type(exc).__name__}: {exc}")
        params = {p.name: self.p(p.name) for p in PARAMETERS}
        self.sync = SensorSync(SyncConfig.for_model(self.pipeline.cfg, params))
        self.fused_pub = self.create_lifecycle_publisher(Image, "fused_state", 10, qos_overriding_options=QOS_OVERRIDES)
        # beside the fused state, under its resolved name as image_transport places its topics (a remap of
        # fused_state moves them too): per-sensor values any plotter reads, and the latched layout
        fused = self.fused_pub.topic_name
        self.attention_pub, self.trust_pub = (
            self.create_lifecycle_publisher(Vector3Stamped, f"{fused}/{name}", 10, qos_overriding_options=QOS_OVERRIDES)
            for name in ("attention", "trust"))
        # the fusion's own speed and yaw rate, from a model with the ego_rate output (also fused_state's last row)
        self.twist_pub = self.create_lifecycle_publisher(
            TwistStamped, f"{fused}/twist", 10, qos_overriding_options=QOS_OVERRIDES) if self.pipeline.cfg.model.rate_output else None
        self.layout_pub = self.create_lifecycle_publisher(
            String, f"{fused}/layout", QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        self.attention_image_pub = None if self._attention_image is None else self.create_lifecycle_publisher(
            Image, f"{fused}/attention_image", 1, qos_overriding_options=QOS_OVERRIDES)
        self._idle = (WARN, "not activated")
        self.get_logger().info(f"configured: model {self.pipeline.model_source} on {self.pipeline.backend.name}, "
                               f"sensors {', '.join(f'{m}={t}' for m, (t, _) in self.sensors.items())}")
        return TransitionCallbackReturn.SUCCESS

    def _configure_failed(self, reason: str) -> TransitionCallbackReturn:
        self.get_logger().error(f"configure failed: {reason}")
        self.pipeline = None  # unconfigured again: its parameters may be changed
        self._idle = (ERROR, f"configure failed: {reason}")
        return TransitionCallbackReturn.FAILURE

    def _attention_renderer(self) -> tuple[FusionModel, Tokenizer]:
        """For attention_image: the pipeline's weights as a CPU torch model (the backends output no token
        weights) and a tokenizer of its own (the pipeline's caches the newest frames for the fusion)."""
        import torch  # loaded by load_model; the node on ONNX Runtime never imports it otherwise

        model, _ = load_model(self.p("checkpoint") or None)
        # torch's default, a thread per core, makes each picture fight everything else for the cores: on 2
        # busy ones its model call took 0.2-1 s instead of 10-20 ms (the torch backend sets the same)
        torch.set_num_threads(self.p("threads"))
        if weights_digest(model) != self.pipeline.weights_digest:
            raise ConfigError("attention_image: the checkpoint's torch model is not the one the pipeline "
                              "runs (did the file change while loading?)")
        return model, Tokenizer(model.cfg)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._qos_declared = True
        for name, (topic, msg_type) in self.sensors.items():
            modality = Modality[name.upper()]
            # qos_reliability / qos_depth give every sensor's default; its qos_overrides.* parameters win. One
            # profile per subscription: rclpy applies the overrides to it in place (it becomes sub.qos_profile)
            qos = QoSProfile(depth=self.p("qos_depth"), reliability=qos_profile_sensor_data.reliability
                             if self.p("qos_reliability") == "best_effort" else ReliabilityPolicy.RELIABLE,
                             durability=qos_profile_sensor_data.durability, history=qos_profile_sensor_data.history)
            resolved = self.resolve_topic_name(topic)
            events = SubscriptionEventCallbacks(
                incompatible_qos=lambda info, t=resolved, q=qos: self._incompatible_qos(t, q, info))
            self._io_subs.append(self.create_subscription(
                msg_type, topic, lambda msg, m=modality: self._on_message(m, msg), qos, event_callbacks=events,
                qos_overriding_options=QOS_OVERRIDES))
        # with a trigger sensor the timer fuses only while that sensor is not fresh (FusionClock's rule)
        self._io_timers.append(self.create_timer(1.0 / self.p("fusion_rate_hz"), self._on_timer))
        if self._attention_image is not None:  # its own timer: rendering stays out of the fusion's callback
            self._io_timers.append(self.create_timer(self.p("attention_image.period_s"),
                                                  self._publish_attention_image))
        result = super().on_activate(state)
        m = self.pipeline.cfg.model
        self.layout_pub.publish(to_rclpy(fused_state_layout_msg(m.dim, m.fusion_tokens, m.heads, self.pipeline.cfg.sensor_names,
                                                                 m.rate_output)))  # once active
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_io()
        self._idle = (WARN, "deactivated")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_io()
        pubs = (self.fused_pub, self.attention_pub, self.trust_pub, self.twist_pub, self.layout_pub, self.attention_image_pub)
        for pub in pubs:
            if pub is not None:
                self.destroy_lifecycle_publisher(pub)
        self.pipeline, self._attention_image = None, None
        self._idle = (WARN, "cleaned up")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_io()
        self._idle = (WARN, "shut down")
        return TransitionCallbackReturn.SUCCESS

    def _release_io(self) -> None:
        for sub in self._io_subs:
            self.destroy_subscription(sub)
        for timer in self._io_timers:
            self.destroy_timer(timer)
        self._io_subs, self._io_timers = [], []

    # --- data path -------------------------------------------------------------------------------

    def _on_message(self, modality: Modality, msg) -> None:
        try:
            frame = to_frame(msg)
        except MalformedMessageError as exc:
            self.sync.drop(modality, "malformed", str(exc))
            self._sensor_log[modality].warning(f"dropped {MODALITIES[modality]} message: {exc}", throttle_duration_sec=5.0)
            return
        health = self.sync.health[modality]
        resets = health.resets
        # the clock reads 0 under sim time before the first /clock: no time to judge stamps by yet
        rejected = self.sync.add(frame, self.get_clock().now().nanoseconds or None, modality)
        if rejected:
            self._sensor_log[modality].warning(f"dropped {MODALITIES[modality]} message: {rejected}",
                                               throttle_duration_sec=5.0)
            return
        if health.resets != resets:
            self._sensor_log[modality].warning(f"{MODALITIES[modality]} time jumped back: its buffers reset "
                                               f"({health.resets} so far)", throttle_duration_sec=5.0)
        if modality in (Modality.CAMERA, Modality.LIDAR):
            try:
                self.pipeline.prepare(frame)  # now, rather than at the next fusion
            except Exception as exc:  # noqa: BLE001 - keep the node alive: the fusion tokenizes it again, and says so
                self._sensor_log[modality].warning(f"could not tokenize a {MODALITIES[modality]} frame as it arrived: "
                                                   f"{exc}", throttle_duration_sec=5.0)
        if self.p("trigger") == MODALITIES[modality]:
            self._fuse(frame.stamp_ns)

    def _on_timer(self) -> None:
        trigger = trigger_modality(self.p("trigger"))
        if trigger is None or not self.sync.fresh(trigger, self.get_clock().now().nanoseconds):
            self._fuse()

    def _fuse(self, trigger_ns: int | None = None) -> None:
        start = time.perf_counter()
        now_ns = self.get_clock().now().nanoseconds if trigger_ns is None else trigger_ns
        snap = self.sync.snapshot(now_ns)
        try:
            state = self.pipeline.fuse(snap)
        except Exception as exc:  # noqa: BLE001 - keep the node alive, say what failed
            self._fuse_errors += 1
            self.get_logger().error(f"fusion failed ({self._fuse_errors} so far): {exc}", throttle_duration_sec=5.0)
            return
        self._last_state = state
        self._masked[list(self.pipeline.cfg.sensors)] += ~state.present  # per Modality
        if state.all_masked:  # the model's defined output from nothing: not a state to act on (diagnostics ERROR)
            self._withheld += 1
            return
        # stamped with the data's time, not this node's clock (which only judged what is fresh): the trigger
        # message's stamp, or the newest sensor stamp received. A timer tick that received nothing newer than
        # the last state would repeat its stamp: the state is already out
        newest = self.sync.newest_stamp_ns()
        stamp_ns = newest if trigger_ns is None else trigger_ns
        if stamp_ns == self._stamp_ns:
            return
        self._stamp_ns = stamp_ns
        self._published = (stamp_ns, snap)
        self.fused_pub.publish(to_rclpy(fused_state_msg(state, stamp_ns)))
        # x, y, z: camera, lidar, IMU; a fourth or fifth sensor's (odometry, a second IMU) is in fused_state's rows
        # and /diagnostics
        self.attention_pub.publish(to_rclpy(sensor_values_msg(stamp_ns, state.frame_id, state.modality_attention[:3])))
        self.trust_pub.publish(to_rclpy(sensor_values_msg(stamp_ns, state.frame_id, trust_values(state)[:3])))
        if self.twist_pub is not None:
            self.twist_pub.publish(to_rclpy(ego_twist_msg(stamp_ns, state.frame_id, state.ego_rate)))
        self._latency_ms = (self.get_clock().now().nanoseconds - newest) / 1e6
        self._processing_ms = (time.perf_counter() - start) * 1e3

    def _publish_attention_image(self) -> None:
        """The newest published state as attention_maps' picture, stamped as that state; nothing when no state
        was published since the last picture."""
        if self._published is None:
            return
        (stamp_ns, snap), self._published = self._published, None
        model, tokenizer = self._attention_image
        try:
            x = tokenizer(snap, self.pipeline.tau)
            caption = f"stamp {stamp_ns / NS_PER_S:.3f} s   tau {'/'.join(f'{v:g}' for v in self.pipeline.tau)}"
            rgb = picture(x, attend(model, x), model.cfg, camera_rgb(snap.camera), caption)
        except Exception as exc:  # noqa: BLE001 - an optional picture must never stop the fusion
            self.get_logger().error(f"attention image failed: {exc}", throttle_duration_sec=5.0)
            return
        frame = CameraFrame(stamp_ns, self.p("frame_id"), rgb, "rgb8")
        self.attention_image_pub.publish(to_rclpy(image_msg(frame)))

    def _publish_diagnostics(self) -> None:
        now_ns = self.get_clock().now().nanoseconds
        state = self._state_machine.current_state[1]  # rclpy has no public getter (rclcpp: get_current_state)
        level, why = (OK, "") if state == "active" else self._idle
        message = f"{state}: {why}" if why else state
        statuses = [Status("fusion_attn: lifecycle", level, message, {"state": state})]
        if state == "active":
            statuses += self._fusion_statuses(now_ns)
        self.diag_pub.publish(to_rclpy(diagnostics_msg(now_ns, statuses, self.get_name())))

    def _fusion_statuses(self, now_ns: int) -> list[Status]:
        self._check_publisher_types()
        period = 1.0 / self.p("fusion_rate_hz")
        # the fusion's side of the policy contract goes with it: policy_node checks it live
        values = {**self.pipeline.backend_info(), **self.pipeline.fusion_terms(self.sync.cfg, self.p("fusion_rate_hz"), self.p("trigger")),
                  "withheld_all_masked": str(self._withheld),
                  **{f"masked_fusions_{name}": str(self._masked[MODALITIES.index(name)]) for name in self.sensors}}
        return diagnostics(self.sync.summary(now_ns), self._last_state, values,
                           self._processing_ms, self._latency_ms, period, tuple(self.sensors))

    # --- parameters and QoS ----------------------------------------------------------------------

    def _on_set_parameters(self, params) -> SetParametersResult:
        changed = {p.name: p.value for p in params}
        # qos_overrides.*: rclpy declares them while configured (read-only: it refuses later changes itself)
        fixed = [n for n in changed if n not in TAU_NAMES and not n.startswith("qos_overrides.")]
        if fixed and self.pipeline is not None:
            return SetParametersResult(successful=False, reason=f"{', '.join(fixed)}: read-only while configured; "
                                       "clean up the node and configure it again")
        stale = [n for n in changed if n in ("qos_reliability", "qos_depth")]
        if stale and self._qos_declared:
            # the first activation declared the qos_overrides.* parameters with these values as defaults, and
            # read-only parameters keep them: a new value would be silently ignored
            return SetParametersResult(successful=False, reason=f"{', '.join(stale)}: fixed since the first "
                                       "activation; restart the node, or set qos_overrides.<topic>.subscription.* "
                                       "in its parameter file")
        if self.pipeline is not None and any(n in TAU_NAMES for n in changed):
            try:  # the next fusion uses it: τ is a model input
                self.pipeline.set_tau([changed.get(n, self.p(n)) for n in TAU_NAMES])
            except ConfigError as exc:
                return SetParametersResult(successful=False, reason=str(exc))
            unread = [n for n in changed if n in TAU_NAMES[1:] and n[len("tau."):] not in self.pipeline.cfg.sensor_names]
            self.get_logger().info(f"tau set to {self.pipeline.tau.tolist()}"
                                   + (f" ({', '.join(unread)}: this model does not read that sensor)" * bool(unread)))
        if "diagnostics_period_s" in changed:  # settable while unconfigured (see fixed); its timer runs already
            self._diag_timer.timer_period_ns = int(changed["diagnostics_period_s"] * NS_PER_S)
        return SetParametersResult(successful=True)

    def _incompatible_qos(self, topic: str, qos: QoSProfile, info) -> None:
        self.get_logger().error(
            f"{topic}: a publisher offers QoS incompatible with this subscription (policy "
            f"{info.last_policy_kind.name}, {info.total_count} so far): NO messages will arrive from it. "
            f"Match its QoS, e.g. set qos_overrides.{topic}.subscription.reliability "
            f"(now {qos.reliability.name.lower()}).")

    def _check_publisher_types(self) -> None:
        """Say once per publisher when one offers another message type on a subscribed topic (the graph
        shows it with any middleware; not every one raises the incompatible-type event)."""
        for sub in self._io_subs:
            expected = msgtype_of(sub.msg_type())
            for info in self.get_publishers_info_by_topic(sub.topic_name):
                key = (sub.topic_name, info.node_namespace, info.node_name, info.topic_type)
                if info.topic_type != expected and key not in self._type_warned:
                    self._type_warned.add(key)
                    self.get_logger().error(f"{sub.topic_name}: publisher {info.node_namespace.rstrip('/')}/{info.node_name} "
                                            f"offers another message type ({info.topic_type}, expected {expected}): "
                                            "no messages will arrive from it")

    def _configured_sensors(self, read: tuple[str, ...]) -> dict[str, tuple[str, type]]:
        """name -> (topic, message class) of each sensor to subscribe: the ones the model reads (`read`) and
        *_type does not configure as none."""
        sensors = {}
        for name in MODALITIES:
            kind = self.p(f"{name}_type")
            if kind == "none" or name not in read:
                continue
            if (name, kind) not in MESSAGE_TYPES:
                choices = [k for m, k in MESSAGE_TYPES if m == name] + ["none"]
                raise ConfigError(f"{name}_type {kind!r} is not one of {choices}")
            topic = self.p(f"{name}_topic")
            if same := [other for other, (t, _) in sensors.items() if self.resolve_topic_name(t) == self.resolve_topic_name(topic)]:
                raise ConfigError(f"{name}_topic {topic} is also {same[0]}_topic: two sensors cannot read one topic")
            sensors[name] = (topic, MESSAGE_TYPES[(name, kind)])
        if not sensors:
            raise ConfigError("every sensor is configured as none")
        if self.p("trigger") not in ("timer", *sensors):
            raise ConfigError(f"trigger {self.p('trigger')!r} must be timer or a configured sensor {list(sensors)}")
        return sensors


def _descriptor(p: Param) -> ParameterDescriptor:
    # read_only=True would lock a parameter from its declaration on, before configure too; the lock while
    # configured is _on_set_parameters', and additional_constraints says so
    d = ParameterDescriptor(description=p.description, read_only=False, additional_constraints=(
        "may be set at run time: the next fusion uses it" if p.runtime else "read-only while configured: "
        "set it while unconfigured (cleanup, then configure again) or in the parameter file"))
    if p.range is not None and isinstance(p.default, float):
        d.floating_point_range = [FloatingPointRange(from_value=float(p.range[0]), to_value=float(p.range[1]))]
    elif p.range is not None:
        d.integer_range = [IntegerRange(from_value=int(p.range[0]), to_value=int(p.range[1]))]
    return d


def _build_only(node: FusionNode) -> int:
    """build_only: configure builds the engine (or finds it valid in the cache); say so and exit."""
    if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
        node.get_logger().fatal("build_only: configure failed (see above)")
        return 1
    info = node.pipeline.backend_info()
    if "backend_fallback" in info or info["backend"] != node.p("backend"):
        node.get_logger().fatal(f"build_only: no {node.p('backend')} engine: {info.get('backend_fallback')}")
        return 1
    engine = getattr(node.pipeline.backend, "engine_path", None)
    if engine is None and getattr(node.pipeline.backend, "whole_step", False) and node.p("backend") == "tensorrt":
        engine = "no engine built: set tensorrt.step_camera to build the one-graph engine of your camera now"
    node.get_logger().info(f"build_only: {info['backend']} ready ({engine or 'nothing to build'}); exiting")
    return 0


def main(args: list[str] | None = None) -> int:
    rclpy.init(args=args if args is not None else sys.argv)
    node = FusionNode()
    try:
        if node.p("build_only"):
            return _build_only(node)
        if node.p("autostart"):
            if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                node.get_logger().fatal("autostart: configure failed (see above); exiting")
                return 1
            node.trigger_activate()
        spin(node)
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
