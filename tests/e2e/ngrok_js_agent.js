// A program of the e2e tests: the real ngrok JavaScript SDK (@ngrok/ngrok) as an agent.
//
//     node ngrok_js_agent.js SERVER_ADDR CA_FILE AUTHTOKEN FORWARD_TO
//
// Connects with the CA in CA_FILE and AUTHTOKEN, opens a TCP endpoint
// forwarding to FORWARD_TO (host:port), prints "URL <url>" then "READY",
// and runs until killed. A failure prints "ERROR <text>" and exits 3.
const fs = require("fs");
const ngrok = require("@ngrok/ngrok");

const [serverAddr, caFile, authtoken, forwardTo] = process.argv.slice(2);

(async () => {
  try {
    const session = await new ngrok.SessionBuilder()
      .serverAddr(serverAddr)
      .caCert(fs.readFileSync(caFile))
      .authtoken(authtoken)
      .connect();
    const listener = await session.tcpEndpoint().listenAndForward("tcp://" + forwardTo);
    console.log("URL " + listener.url());
    console.log("READY");
  } catch (e) {
    console.log("ERROR " + String(e && e.message ? e.message : e).replace(/\n/g, " | "));
    process.exit(3);
  }
  setInterval(() => {}, 1 << 30);
})();
