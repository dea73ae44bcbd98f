package lars.client;

/** One node of a route: dotted IPv4 address and port. */
public record Host(String ip, int port) {
    /** Parse "ip:port"; throws {@link InvalidValueException}. */
    public static Host parse(String text) {
        int colon = text.lastIndexOf(':');
        if (colon < 0 || Wire.parseIp(text.substring(0, colon)) < 0) {
            throw new InvalidValueException("not IP:PORT: " + text);
        }
        String digits = text.substring(colon + 1);
        if (digits.isEmpty() || digits.length() > 5 || !digits.chars().allMatch(c -> c >= '0' && c <= '9')) {
            throw new InvalidValueException("not IP:PORT: " + text);
        }
        int port = Integer.parseInt(digits);
        if (port < 1 || port > 65535) {
            throw new InvalidValueException("port must be from 1 to 65535: " + text);
        }
        return new Host(text.substring(0, colon), port);
    }

    /** "ip:port". */
    @Override
    public String toString() {
        return ip + ":" + port;
    }
}
