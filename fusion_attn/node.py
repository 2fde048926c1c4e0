"""fusion_node: live camera, lidar and IMU topics in; fused state and diagnostics out (rclpy lifecycle).

configure = load the model onto its backend; activate = subscribe, publish, fuse on a timer (or on a
trigger sensor); deactivate / cleanup release them. Every message goes through the core's adapters
and sensor sync; a bad one is counted, logged (throttled) and dropped, never fatal.
"""

from __future__ import annotations

import sys
import time

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import Vector3Stamped
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.qos_overriding_options import QoSOverridingOptions
from sensor_msgs.msg import CompressedImage, Image, Imu, LaserScan, PointCloud2
from std_msgs.msg import String

from .adapters import msgtype_of, to_frame
from .errors import ConfigError, FusionAttnError, MalformedMessageError
from .frames import MODALITIES, FusedState, Modality
from .messages import diagnostics_msg, fused_state_layout_msg, fused_state_msg, sensor_values_msg, to_rclpy
from .outputs import diagnostics, trust_values
from .params import PARAMETERS, TAU_NAMES, Param
from .pipeline import FusionPipeline, validate_tau
from .spin import spin
from .sync import SensorSync, SyncConfig

MESSAGE_TYPES = {("camera", "image"): Image, ("camera", "compressed"): CompressedImage,
                 ("lidar", "pointcloud2"): PointCloud2, ("lidar", "laserscan"): LaserScan, ("imu", "imu"): Imu}
# ROS 2's standard per-topic QoS parameters, qos_overrides.<topic>.<publisher|subscription>.<policy> for
# history, depth and reliability: rclpy declares them (read-only) as it creates each publisher and subscription
QOS_OVERRIDES = QoSOverridingOptions.with_default_policies()


class FusionNode(LifecycleNode):
    def __init__(self, **kwargs):
        super().__init__("fusion_node", **kwargs)
        for p in PARAMETERS:
            self.declare_parameter(p.name, p.default, _descriptor(p))
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.pipeline: FusionPipeline | None = None
        self._subs, self._timers = [], []
        self._last_state: FusedState | None = None
        self._processing_ms = self._latency_ms = 0.0
        self._fuse_errors = 0
        self._withheld = 0  # fusions with every sensor masked: no state to publish
        self._stamp_ns: int | None = None  # of the last state published
        self._qos_declared = False  # set at the first activation: see _on_set_parameters
        self._type_warned: set[tuple[str, ...]] = set()
        # one child logger per sensor: rclpy throttles per logger and call site, so a flood on one
        # sensor must not silence the reports of another
        self._sensor_log = {m: self.get_logger().get_child(MODALITIES[m]) for m in Modality}

    def p(self, name: str):
        return self.get_parameter(name).value

    # --- lifecycle -------------------------------------------------------------------------------

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.sensors = self._configured_sensors()
            self.pipeline = FusionPipeline.from_params({p.name: self.p(p.name) for p in PARAMETERS})
        except FusionAttnError as exc:
            self.get_logger().error(f"configure failed: {exc}")
            return TransitionCallbackReturn.FAILURE
        except Exception as exc:  # noqa: BLE001 - rclpy would swallow it silently; say what failed
            self.get_logger().error(f"configure failed: {type(exc).__name__}: {exc}")
            return TransitionCallbackReturn.FAILURE
        params = {p.name: self.p(p.name) for p in PARAMETERS}
        self.sync = SensorSync(SyncConfig.from_params(params, self.pipeline.cfg.imu.window_s))
        self.fused_pub = self.create_lifecycle_publisher(Image, "fused_state", 10, qos_overriding_options=QOS_OVERRIDES)
        # beside the fused state, under its resolved name as image_transport places its topics (a remap of
        # fused_state moves them too): per-sensor values any plotter reads, and the latched layout
        fused = self.fused_pub.topic_name
        self.attention_pub, self.trust_pub = (
            self.create_lifecycle_publisher(Vector3Stamped, f"{fused}/{name}", 10, qos_overriding_options=QOS_OVERRIDES)
            for name in ("attention", "trust"))
        self.layout_pub = self.create_lifecycle_publisher(
            String, f"{fused}/layout", QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        self.diag_pub = self.create_lifecycle_publisher(DiagnosticArray, "/diagnostics", 10,
                                                        qos_overriding_options=QOS_OVERRIDES)
        self.get_logger().info(f"configured: model {self.pipeline.model_source} on {self.pipeline.backend.name}, "
                               f"sensors {', '.join(f'{m}={t}' for m, (t, _) in self.sensors.items())}")
        return TransitionCallbackReturn.SUCCESS

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
            self._subs.append(self.create_subscription(
                msg_type, topic, lambda msg, m=modality: self._on_message(m, msg), qos, event_callbacks=events,
                qos_overriding_options=QOS_OVERRIDES))
        if self.p("trigger") == "timer":
            self._timers.append(self.create_timer(1.0 / self.p("fusion_rate_hz"), self._fuse))
        self._timers.append(self.create_timer(self.p("diagnostics_period_s"), self._publish_diagnostics))
        result = super().on_activate(state)
        m = self.pipeline.cfg.model
        self.layout_pub.publish(to_rclpy(fused_state_layout_msg(m.dim, m.fusion_tokens, m.heads)))  # once active
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_io()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_io()
        for pub in (self.fused_pub, self.attention_pub, self.trust_pub, self.layout_pub, self.diag_pub):
            self.destroy_lifecycle_publisher(pub)
        self.pipeline = None
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_io()
        return TransitionCallbackReturn.SUCCESS

    def _release_io(self) -> None:
        for sub in self._subs:
            self.destroy_subscription(sub)
        for timer in self._timers:
            self.destroy_timer(timer)
        self._subs, self._timers = [], []

    # --- data path -------------------------------------------------------------------------------

    def _on_message(self, modality: Modality, msg) -> None:
        try:
            frame = to_frame(msg)
        except MalformedMessageError as exc:
            self.sync.drop(modality, "malformed")
            self._sensor_log[modality].warning(f"dropped {MODALITIES[modality]} message: {exc}", throttle_duration_sec=5.0)
            return
        health = self.sync.health[modality]
        resets = health.resets
        # the clock reads 0 under sim time before the first /clock: no time to judge stamps by yet
        rejected = self.sync.add(frame, self.get_clock().now().nanoseconds or None)
        if rejected:
            self._sensor_log[modality].warning(f"dropped {MODALITIES[modality]} message: {rejected}",
                                               throttle_duration_sec=5.0)
            return
        if health.resets != resets:
            self._sensor_log[modality].warning(f"{MODALITIES[modality]} time jumped back: its buffers reset "
                                               f"({health.resets} so far)", throttle_duration_sec=5.0)
        if modality is not Modality.IMU:
            self.pipeline.tokenizer.prepare(frame)  # now, rather than at the next fusion
        if self.p("trigger") == MODALITIES[modality]:
            self._fuse(frame.stamp_ns)

    def _fuse(self, trigger_ns: int | None = None) -> None:
        start = time.perf_counter()
        now_ns = self.get_clock().now().nanoseconds if trigger_ns is None else trigger_ns
        try:
            state = self.pipeline.fuse(self.sync.snapshot(now_ns))
        except Exception as exc:  # noqa: BLE001 - keep the node alive, say what failed
            self._fuse_errors += 1
            self.get_logger().error(f"fusion failed ({self._fuse_errors} so far): {exc}", throttle_duration_sec=5.0)
            return
        self._last_state = state
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
        self.fused_pub.publish(to_rclpy(fused_state_msg(state, stamp_ns)))
        self.attention_pub.publish(to_rclpy(sensor_values_msg(stamp_ns, state.frame_id, state.modality_attention)))
        self.trust_pub.publish(to_rclpy(sensor_values_msg(stamp_ns, state.frame_id, trust_values(state))))
        self._latency_ms = (self.get_clock().now().nanoseconds - newest) / 1e6
        self._processing_ms = (time.perf_counter() - start) * 1e3

    def _publish_diagnostics(self) -> None:
        self._check_publisher_types()
        now_ns = self.get_clock().now().nanoseconds
        period = 1.0 / self.p("fusion_rate_hz")
        # the fusion's side of the policy contract goes with it: policy_node checks it live
        values = {**self.pipeline.backend_info(), **self.pipeline.fusion_terms(self.sync.cfg, self.p("fusion_rate_hz")),
                  "withheld_all_masked": str(self._withheld)}
        statuses = diagnostics(self.sync.summary(now_ns), self._last_state, values,
                               self._processing_ms, self._latency_ms, period, tuple(self.sensors))
        self.diag_pub.publish(to_rclpy(diagnostics_msg(now_ns, statuses, self.get_name())))

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
            try:
                tau = validate_tau([changed.get(n, self.p(n)) for n in TAU_NAMES])
            except ConfigError as exc:
                return SetParametersResult(successful=False, reason=str(exc))
            self.pipeline.set_tau(tau)  # the next fusion uses it: τ is a model input
            self.get_logger().info(f"tau set to {tau.tolist()}")
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
        for sub in self._subs:
            expected = msgtype_of(sub.msg_type())
            for info in self.get_publishers_info_by_topic(sub.topic_name):
                key = (sub.topic_name, info.node_namespace, info.node_name, info.topic_type)
                if info.topic_type != expected and key not in self._type_warned:
                    self._type_warned.add(key)
                    self.get_logger().error(f"{sub.topic_name}: publisher {info.node_namespace.rstrip('/')}/{info.node_name} "
                                            f"offers another message type ({info.topic_type}, expected {expected}): "
                                            "no messages will arrive from it")

    def _configured_sensors(self) -> dict[str, tuple[str, type]]:
        sensors = {}
        for name in MODALITIES:
            kind = self.p(f"{name}_type")
            if kind == "none":
                continue
            if (name, kind) not in MESSAGE_TYPES:
                choices = [k for m, k in MESSAGE_TYPES if m == name] + ["none"]
                raise ConfigError(f"{name}_type {kind!r} is not one of {choices}")
            sensors[name] = (self.p(f"{name}_topic"), MESSAGE_TYPES[(name, kind)])
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
