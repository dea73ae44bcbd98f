package lars.client;

/** The agent's return codes (0-3 as in the original Lars, 4 a Lars addition). */
public final class RetCode {
    public static final int SUCC = 0;
    public static final int OVERLOAD = 1;
    public static final int SYSTEM_ERROR = 2;
    public static final int NOEXIST = 3;
    public static final int BAD_REQUEST = 4;

    private RetCode() {}

    /** The name of a code ("OVERLOAD"), or its number as text. */
    public static String name(int code) {
        switch (code) {
            case SUCC: return "SUCC";
            case OVERLOAD: return "OVERLOAD";
            case SYSTEM_ERROR: return "SYSTEM_ERROR";
            case NOEXIST: return "NOEXIST";
            case BAD_REQUEST: return "BAD_REQUEST";
            default: return Integer.toString(code);
        }
    }
}
