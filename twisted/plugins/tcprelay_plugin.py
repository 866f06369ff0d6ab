"""
twistd and endpoint plugins for tcprelay: declarative only.

twistd imports every module in twisted/plugins/ when it lists or looks up
plugins, so this file must stay cheap: it imports nothing from tcprelay at
module level.  The daemon's Options and makeService live in
``tcprelay.relay.daemon`` (composing ``tcprelay.tap``); the
endpoint lives in ``tcprelay.agent.endpoint``.
"""

from typing import Any

from twisted.application.service import ServiceMaker
from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer

tcprelay_service = ServiceMaker(
    "tcprelay",
    "tcprelay.relay.daemon",
    "Publish TCP services behind NAT through muxado v1 sessions (reverse tunnel relay)",
    "tcprelay",
)


@implementer(IPlugin, IStreamServerEndpointStringParser)
class _RelayEndpointParser:
    """``tcprelay:host=RELAY:port=PORT[:secretFile=..][:requestPort=..]``."""

    prefix = "tcprelay"

    def parseStreamServer(self, reactor: Any, *args: str, **kwargs: str) -> Any:
        from tcprelay.agent.endpoint import parse_endpoint

        return parse_endpoint(reactor, *args, **kwargs)


tcprelay_endpoint = _RelayEndpointParser()
