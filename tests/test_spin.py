"""fusion_attn.spin: a node stopped by a signal mid-callback exits cleanly; a real error still raises.
Each case runs in its own process: it shuts its ROS context down."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, rclpy
    from std_msgs.msg import Empty
    from fusion_attn.spin import spin
    os.environ["ROS_DOMAIN_ID"] = str(150 + os.getpid() % 50)
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
                          text=True, timeout=60)


def test_a_callback_cut_short_by_shutdown_is_a_clean_exit():
    done = _run(shutdown=True)
    assert done.returncode == 0 and "spin returned" in done.stdout, done.stderr


def test_an_error_in_a_callback_still_raises():
    done = _run(shutdown=False)
    assert done.returncode != 0 and "a bug in a callback" in done.stderr and "spin returned" not in done.stdout
