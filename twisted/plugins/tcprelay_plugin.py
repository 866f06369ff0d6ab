"""twistd plugin for tcprelay: declarative only.

twistd imports every module in twisted/plugins/ when it lists or looks up
plugins, so this file must stay cheap: it names ``tcprelay.tap`` and imports
nothing from tcprelay. Options and makeService live in ``tcprelay.tap``.
"""

from twisted.application.service import ServiceMaker

tcprelay_service = ServiceMaker(
    "tcprelay",
    "tcprelay.tap",
    "Publish TCP services behind NAT through muxado v1 sessions (reverse tunnel relay)",
    "tcprelay",
)

# TODO: the ``tcprelay:`` server endpoint parser (an
# IStreamServerEndpointStringParser provider) is declared here once the agent
# exists, so that serverFromString(reactor, "tcprelay:host=...:port=...") and
# ``twistd web --listen tcprelay:...`` find it.
