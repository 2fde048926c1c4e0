"""fusion_attn.spin: a node stopped by a signal mid-callback exits cleanly; a real error still raises; and a
node that does not stop fails its test with its threads' stacks.
Each case runs in its own process: it shuts its ROS context down."""

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import ros_domain, stop_node, wait_until

SCRIPT = textwrap.dedent("""
    import rclpy
    from std_msgs.msg import Empty
    from fusion_attn.spin import spin
    rclpy.init()
    node = rclpy.create_node("spin_probe")
    pub = node.create_publisher(Empty, "spin_probe", 1)

    def tick():
        if {shutdown}:
            rclpy.try_shutdown()  # what SIGTERM's handler does, here between two lines of a callback
            pub.publish(Empty())  # raises: the publisher's context is invalid
        raise ValueError("a bug in a callback")

    node.create_timer(0.01, tick)
    spin(node)
    print("spin returned")
""")


def _run(shutdown: bool) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT.format(shutdown=shutdown)], check=False, capture_output=True,
                          text=True, timeout=60,
                          env=dict(os.environ, ROS_DOMAIN_ID=ros_domain(7)))


def test_a_callback_cut_short_by_shutdown_is_a_clean_exit():
    done = _run(shutdown=True)
    assert done.returncode == 0 and "spin returned" in done.stdout, done.stderr


def test_an_error_in_a_callback_still_raises():
    done = _run(shutdown=False)
    assert done.returncode != 0 and "a bug in a callback" in done.stderr and "spin returned" not in done.stdout


HANGS_ON_SIGTERM = textwrap.dedent("""
    import signal, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    def stuck_in_shutdown():
        print("ready", flush=True)
        time.sleep(60)
    stuck_in_shutdown()
""")


def test_a_node_that_hangs_on_sigterm_fails_its_test_with_its_stack(tmp_path):
    """What a test shows when a node process does not stop (conftest.stop_node): its log, ending with the
    stack of every thread at the moment it was aborted."""
    log = tmp_path / "node.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", HANGS_ON_SIGTERM], stdout=out, stderr=subprocess.STDOUT)
    assert wait_until(lambda: "ready" in log.read_text(), 30)
    with pytest.raises(pytest.fail.Exception, match=r"still running 1 s after SIGTERM(.|\n)*in stuck_in_shutdown"):
        stop_node(proc, log, timeout=1)
    assert proc.returncode is not None
